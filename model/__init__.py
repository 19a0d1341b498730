"""The GRU text classifier: model, tokenizer, data, training and the artifact format."""

from .artifact import ArtifactError, Classifier, load
from .gru import GRUClassifier, ModelConfig
from .tokenizer import Vocab, tokenize

__all__ = ["ArtifactError", "Classifier", "GRUClassifier", "ModelConfig", "Vocab", "load",
           "tokenize"]
