"""ONNX in and out: the torch -> ONNX export step, finishing a file (manifest inside, checker,
atomic write), onnxruntime sessions and providers, and the external-data guard.

Floor 1: onnx and onnxruntime are imported inside the functions that use them, and torch only
inside the export step, so `predict` on an .onnx file never loads PyTorch.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

from edgetransfer import config
from edgetransfer.errors import EdgeTransferError, ExportError, ManifestError, first_line
from edgetransfer.fileio import atomic_write_bytes, user_os_error
from edgetransfer.manifest import METADATA_KEY, Manifest

OPT_LEVELS = ("disable", "basic", "extended", "all")


def session_options(threads: int | None = None, opt_level: str = "all"):
    """onnxruntime settings shared by predict, evaluate, bench, verify and export.

    Args:
        threads: intra-op threads (None: onnxruntime's default, one per core).
        opt_level: graph optimisation level; "extended" is the highest portable one.
    """
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[opt_level]
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # No busy-waiting between runs: on a shared laptop/Jetson spinning burns a core for nothing.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


# --provider name -> onnxruntime execution providers, preferred first. GPU providers keep the CPU
# one last so operators they lack still run (onnxruntime's own fallback rule).
PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
    "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
}


def resolve_providers(provider: str = config.PROVIDER) -> list[str]:
    """The onnxruntime providers for a --provider name, checked against this installation."""
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise EdgeTransferError(
            f"unknown provider {provider!r}; choose one of: {', '.join(PROVIDERS)}"
        )
    available = ort.get_available_providers()
    wanted = PROVIDERS[provider][0]
    if wanted not in available:
        have = [name for name, ps in PROVIDERS.items() if ps[0] in available]
        raise EdgeTransferError(
            f"provider {provider} ({wanted}) is not available in this onnxruntime "
            f"installation; available: {', '.join(have) or 'none'}"
        )
    return [p for p in PROVIDERS[provider] if p in available]


def open_session(
    path: str | os.PathLike,
    threads: int | None = None,
    opt_level: str = "all",
    provider: str = config.PROVIDER,
):
    """An onnxruntime session; a file ORT cannot load becomes a one-line ManifestError."""
    import onnxruntime as ort

    path = Path(path)
    providers = resolve_providers(provider)
    check_external_data(path)
    try:
        return ort.InferenceSession(
            str(path), session_options(threads, opt_level), providers=providers
        )
    except Exception as e:  # ORT raises its own exception types
        first = first_line(e)
        raise ManifestError(f"{path.name} is not a loadable ONNX model: {first}") from None


def check_external_data(path: Path) -> None:
    """Refuse an ONNX file whose external tensor data lies outside its own folder.

    Checked on the protobuf alone, before any external file is opened: a model from elsewhere
    must not make us read ``../secret.bin``, ``/etc/passwd`` or a symlink pointing out of the
    folder. Every tensor counts, including Constant attributes and If/Loop sub-graphs.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ManifestError(f"{path.name} is not a readable ONNX model: {e}") from None
    folder = path.parent.resolve()
    for tensor in _all_tensors(model.graph):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        try:
            target = (folder / location).resolve()
            inside = folder in target.parents
        except (OSError, ValueError, RuntimeError):  # NUL bytes, symlink loops
            inside = False
        if os.path.isabs(location) or ".." in Path(location).parts or not inside:
            raise ManifestError(
                f"{path.name} refers to external data outside its folder ({location!r}); "
                "refusing to load it"
            )


def _all_tensors(graph):
    """Every TensorProto of a graph: initializers, sparse ones, node attributes, sub-graphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for g in attr.graphs:
                yield from _all_tensors(g)


def torch_onnx_export(
    module,
    example,
    path: Path,
    *,
    exporter: str,
    opset: int | None,
    input_name: str,
    output_names: list[str],
) -> None:
    """torch.onnx.export with the exporter chosen explicitly and a dynamic batch dimension."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=True,
                external_data=False,
                input_names=[input_name],
                output_names=output_names,
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                verbose=False,
            )
        else:
            axes = {name: {0: "batch"} for name in [input_name, *output_names]}
            torch.onnx.export(
                module,
                (example,),
                str(path),
                dynamo=False,
                input_names=[input_name],
                output_names=output_names,
                opset_version=opset or 17,
                dynamic_axes=axes,
            )


def finish_onnx(tmp: Path, path: Path, manifest: Manifest, full_check: bool = True) -> None:
    """Embed the manifest, run the ONNX checker, write atomically."""
    import onnx

    finish_proto(onnx.load(str(tmp)), path, manifest, full_check)


def finish_proto(proto, path: Path, manifest: Manifest, full_check: bool = True) -> None:
    """:func:`finish_onnx` for a ModelProto in memory (one composed with the onnx library)."""
    import onnx

    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: manifest.to_json()})
    proto.producer_name = "edgetransfer"
    try:
        onnx.checker.check_model(proto, full_check=full_check)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name} fails onnx.checker: {first_line(e)}") from None
    atomic_write_bytes(path, proto.SerializeToString())


@contextlib.contextmanager
def onnx_step(what: str, *temps: Path, target: Path | None = None):
    """One step that writes ONNX through temp files: any foreign failure becomes a one-line
    ExportError naming `what`, and the temp files are removed whatever happens.

    A full disk or a permission problem, even wrapped by the exporter, stays an OSError naming
    the file (`target` when the error names none), so the CLI gives its usual advice."""
    try:
        yield
    except ExportError:
        raise
    except Exception as e:  # exporters and converters fail in many types
        found = user_os_error(e)
        if found is not None:
            name = found.filename
            if target is not None and (name is None or Path(os.fsdecode(name)) in temps):
                name = target  # the file the user asked for, not our temp beside it
            raise type(found)(found.errno, found.strerror, name) from None
        raise ExportError(f"{what} failed: {first_line(e)}") from None
    finally:
        for t in temps:
            t.unlink(missing_ok=True)
