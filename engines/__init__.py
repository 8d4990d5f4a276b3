"""Inference backends for UniCT: PyTorch (reference), ONNX Runtime, TensorRT, Triton.

Every backend implements :class:`engines.base.Engine`; :mod:`engines.registry` picks the
first available one from the order in config and says why the others were skipped.

Modules
-------
:mod:`engines.pytorch`
    The reference (eager, optional FP16 / ``torch.compile``) and
    :class:`~engines.pytorch.ReportGenerator`, the one report decoder all backends use.
:mod:`engines.export`
    ONNX export of the visual path, cached per checkpoint SHA-256.
:mod:`engines.onnxruntime`
    The exported graph in ONNX Runtime (CUDA provider when present, else CPU).
:mod:`engines.tensorrt`
    Plan identity (file name + JSON sidecar) and the runtime on PyTorch CUDA tensors.
:mod:`engines.build`
    ``unict-node build-engine``: TensorRT 10 plan builds (FP16/FP32/INT8).
:mod:`engines.triton`
    The visual path on an NVIDIA Triton Inference Server shared by many workers
    (``tritonclient`` over HTTP), the report decoded locally.
:mod:`engines.triton_repository`
    Triton model repository entries (``config.pbtxt`` + ``1/model.plan`` or
    ``1/model.onnx``) for the plan or the ONNX export.
:mod:`engines.registry`
    Backend names, availability report, fallback selection.
:mod:`engines.samples`
    Sample inputs: a preprocessed phantom volume (INT8 calibration, parity tests,
    benchmarks) and a seeded random checkpoint for engine tests.

Decisions
---------
What is exported
    The visual path: encoder, task adapters, fusion, FiLM modulation, classification and
    segmentation heads, and the decoder's memory. Outputs are ``cls_probs`` and
    ``seg_probs`` (the sigmoid is inside the graph: the node consumes probabilities, the
    engines fuse it into the last kernel, and no extra pass over the ``(10, D, H, W)``
    map runs outside), ``fusion_attention`` and ``memory``.
Opset 18
    Implemented by ONNX Runtime (>= 1.14) and by the ONNX parser of every TensorRT 10
    release; LayerNormalization is one node (TensorRT keeps it in FP32 in FP16 builds).
Dynamic axes
    ``batch`` and ``slices`` of the input (and the matching output axes, plus
    ``memory_tokens = 3 + slices / 3``) are symbolic: positions are sinusoidal and the
    banded attention masks are computed from the token count, so one graph serves any
    slice count. ``slices`` must be a multiple of 3 (slice triplets: the graph reshapes
    ``D`` into ``D / 3`` 3-channel images; other counts fail in that Reshape, so the
    engines refuse them first with a clear error). ``H, W`` are fixed by the model card.
    Checked by the tests: the graph runs at 72 and 48 slices, batch 1 and 2, matching
    PyTorch. The TorchScript-based exporter (``dynamo=False``) is used: it needs only
    ``onnx`` and exports in seconds; the ``torch.export`` exporter would add the
    ``onnxscript`` dependency.
Report decoding stays in PyTorch, from the exported ``memory``
    The report decoder (2 layers, d = 128 in ``small``; 3 layers, d = 512 in ``full``)
    runs greedy decoding for at most 96 tokens in PyTorch on the engine's device
    (:class:`~engines.pytorch.ReportGenerator`), for every backend. Reasons:

    - it is a modest share of a job. Measured on ``small`` (2-core CPU shared with a
      training run, 1 thread): visual path 0.30 s in PyTorch, 0.12 s in ONNX Runtime;
      greedy decoding 0.27 s in the worst case of 95 tokens (a random decoder never
      emits EOS; trained reports are shorter). A job also receives, preprocesses, and
      writes SEG and SR, the SEG alone taking 1.7-5 s;
    - a decoder-step model with a key/value cache would be a second exported graph with
      ``2 x layers`` cache inputs and outputs whose length grows every step, and the
      greedy loop would still cross the host per token (one execute per token in ONNX
      Runtime or TensorRT, each with new shapes), which saves little at batch 1;
    - the same code decodes for every backend, so report tokens are identical whenever
      the memories agree (tested: ONNX Runtime gives the reference's tokens exactly).

    On a GPU the decoder runs on the same device and CUDA stream as the TensorRT plan,
    reading the ``memory`` output in place. The greedy loop recomputes the whole prefix
    each step (1.1 ms per step at 1 token, 7.5 ms at 95 tokens here), so a key/value
    cache in :class:`model.network.heads.ReportDecoder` would cut the worst case about
    3x, in PyTorch, for every backend at once: the step to take if decoding ever matters.
"""
