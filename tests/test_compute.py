"""The step runner's pure parts, on the CPU: buckets and padding give the same results."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from model.gru import GRUClassifier, ModelConfig
from worker.compute import BATCH_BUCKETS, TOKEN_BUCKETS, Stepper, bucket_for, pad_round

pytestmark = pytest.mark.unit


def test_bucket_for():
    assert bucket_for(1, BATCH_BUCKETS) == 1
    assert bucket_for(3, BATCH_BUCKETS) == 4
    assert bucket_for(8192, BATCH_BUCKETS) == 8192
    assert bucket_for(8193, BATCH_BUCKETS) == 16384
    assert bucket_for(65537, BATCH_BUCKETS) is None
    assert bucket_for(5, TOKEN_BUCKETS) == 8 and bucket_for(33, TOKEN_BUCKETS) is None


def test_pad_round_adds_zero_length_zero_state_rows():
    h = torch.ones(2, 3, 4)
    ids = torch.tensor([[5, 6], [7, 0], [8, 9]])
    hp, ip, lp = pad_round(h, ids, torch.tensor([2, 1, 2]), 4, 4)
    assert hp.shape == (2, 4, 4) and torch.equal(hp[:, 3], torch.zeros(2, 4))
    assert ip.tolist() == [[5, 6, 0, 0], [7, 0, 0, 0], [8, 9, 0, 0], [0, 0, 0, 0]]
    assert lp.tolist() == [2, 1, 2, 0]


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 40), K=st.integers(1, 40), layers=st.integers(1, 2), seed=st.integers(0, 99))
def test_bucketed_step_equals_eager_step(B, K, layers, seed):
    torch.manual_seed(seed)
    model = GRUClassifier(ModelConfig(60, 3, 8, 12, layers))
    eager = Stepper(model, buckets=False)
    bucketed = Stepper(model, buckets=True)
    h = torch.randn(layers, B, 12)
    lengths = torch.randint(0, K + 1, (B,))
    ids = torch.randint(2, 60, (B, K)) * (torch.arange(K)[None, :] < lengths[:, None])
    h1, p1 = eager.step(h, ids, lengths)
    h2, p2 = bucketed.step(h, ids, lengths)
    assert h2.shape == h1.shape and p2.shape == p1.shape
    assert (h1 - h2).abs().max() <= 1e-5 and (p1 - p2).abs().max() <= 1e-5


def test_float16_is_refused_on_the_cpu():
    model = GRUClassifier(ModelConfig(10, 2, 4, 4))
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        Stepper(model, dtype="float16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 5e-3)])
def test_cuda_graph_step_equals_cpu_step(dtype, tol):
    torch.manual_seed(0)
    model = GRUClassifier(ModelConfig(500, 5, 32, 64, 2))
    cpu = Stepper(model, buckets=False)
    ref_h = torch.randn(2, 37, 64)
    lengths = torch.randint(0, 9, (37,))
    ids = torch.randint(2, 500, (37, 8)) * (torch.arange(8)[None, :] < lengths[:, None])
    h1, p1 = cpu.step(ref_h, ids, lengths)
    import copy
    gpu = Stepper(copy.deepcopy(model), device="cuda", dtype=dtype)
    for _ in range(2):  # capture, then replay
        h2, p2 = gpu.step(ref_h.cuda(), ids.cuda(), lengths.cuda())
    assert gpu._graphs
    assert (h1 - h2.cpu()).abs().max() <= tol and (p1 - p2.cpu()).abs().max() <= tol


def test_supervisor_child_command_lines():
    import sys
    from worker.supervisor import child_argv
    argv = ["run", "--processes", "3", "--bootstrap", "k:9092", "--metrics-port", "9108",
            "--processes=3"]
    assert child_argv(argv, 2, 9108) == [sys.executable, "-m", "worker", "run", "--bootstrap",
                                         "k:9092", "--metrics-port", "9110"]
    assert child_argv(["run"], 1, 0)[-2:] == ["--metrics-port", "0"]
