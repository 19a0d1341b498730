"""Development tooling, kept out of the production package (and out of the image): local
services (``services``), the worker launcher (``launcher``), input streams (``streams``),
fault injection (``faults``) and the demo (``demo``). The tests, the benchmarks and
``make demo`` all use these, so each exists once."""
