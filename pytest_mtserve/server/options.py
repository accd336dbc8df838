"""Command-line options of the model server (`mtserve serve`, `python -m pytest_mtserve.server`).

Names follow NeMo's reference deployment where they overlap, in dash form.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

# Core attention of the local spec: Megatron's unfused softmax(QK^T)V, or torch's fused
# scaled_dot_product_attention (see sdpa_attention.py); "auto" picks by device (model.py).
ATTENTION_BACKENDS = ("unfused", "sdpa")
ATTENTION_CHOICES = ("auto", *ATTENTION_BACKENDS)
CUDA_GRAPH_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class ServerOptions:
    checkpoint: Path
    tp: int
    pp: int
    max_batch_size: int
    inference_max_seq_length: int
    host: str
    port: int
    triton_port: int
    model_name: str
    device: str
    dtype: str
    attention_backend: str
    queue_delay_us: int
    request_timeout: float
    frontend_processes: int = 0  # 0: default_frontend_processes()
    cuda_graphs: str = "auto"  # see uses_cuda_graphs()
    triton_instances: int = 2
    gil_switch_interval_ms: float = 0.5
    log_batches: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="Megatron checkpoint: a run directory (the latest iteration is served) or one iter_NNNNNNN folder")
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1,
                        help="tensor-parallel ranks the model is split over (default: 1)")
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1,
                        help="pipeline-parallel stages; only 1 is supported for now")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="most requests Triton's dynamic batcher puts into one forward pass (default: 8)")
    parser.add_argument("--inference-max-seq-length", type=int, default=4096,
                        help="longest prompt + completion accepted, in tokens (default: 4096)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the OpenAI-compatible HTTP server binds (default: 127.0.0.1)")
    parser.add_argument("--port", "--server-port", dest="port", type=int, default=8080,
                        help="port of the OpenAI-compatible HTTP server; 0 picks a free one (default: 8080)")
    parser.add_argument("--triton-port", type=int, default=0,
                        help="Triton's HTTP port on 127.0.0.1; 0 picks a free one (default: 0)")
    parser.add_argument("--model-name", "--triton-model-name", dest="model_name", default="megatron_model",
                        help="model name the API serves and requests must name (default: megatron_model)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto uses the GPUs when there are any (default: auto)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="compute dtype; auto is bfloat16 on GPU, float32 on CPU (default: auto)")
    parser.add_argument("--attention-backend", choices=ATTENTION_CHOICES, default="auto",
                        help="core attention: torch's fused scaled_dot_product_attention (sdpa) or "
                             "Megatron's unfused softmax(QK^T)V; auto is sdpa on GPUs and unfused on "
                             "the CPU, where the demo's baselines were recorded (default: auto)")
    parser.add_argument("--cuda-graphs", choices=CUDA_GRAPH_CHOICES, default="auto",
                        help="run log-likelihood prefills as CUDA graphs, replayed per padded shape "
                             "instead of launching every kernel from Python; auto is on with CUDA "
                             "at --tp 1 (default: auto)")
    parser.add_argument("--queue-delay-us", type=int, default=2000,
                        help="how long Triton waits to fill a batch, in microseconds (default: 2000; a client "
                             "that keeps two batches in flight fills them at 100000, as the plugin passes)")
    parser.add_argument("--triton-instances", type=int, default=2, metavar="N",
                        help="Triton model instances handing batches to the engine in turn: with 2, the "
                             "next batch reaches the engine's process while one runs, not after it (default: 2)")
    parser.add_argument("--gil-switch-interval-ms", type=float, default=0.5, metavar="MS",
                        help="how long the engine's thread in rank 0 waits for the GIL while a Triton "
                             "handler thread holds it (sys.setswitchinterval); Python's 5 ms left the "
                             "GPU idle ~5 ms before each batch (default: 0.5)")
    parser.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds the HTTP front end waits for Triton per request (default: 600)")
    parser.add_argument("--frontend-processes", type=int, default=0, metavar="N",
                        help="HTTP front end processes sharing the port: parsing, tokenizing and "
                             "building responses take a core each; 0 picks one per 4 CPU cores, "
                             "at most 4 (default: 0)")
    parser.add_argument("--log-batches", action="store_true",
                        help="print a line per batch to stderr: its requests, the milliseconds of the "
                             "engine's run, of its wait for the engine and of the Triton callable, and "
                             "the engine's idle time before it, to tune "
                             "--max-batch-size, --queue-delay-us and the requests in flight")


def parse_server_options(argv: list[str] | None = None, prog: str = "mtserve serve") -> ServerOptions:
    parser = argparse.ArgumentParser(prog=prog, description="Serve a Megatron-Core checkpoint over an OpenAI-compatible API.")
    add_server_arguments(parser)
    return options_from_namespace(parser.parse_args(argv), parser)


def options_from_namespace(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ServerOptions:
    for name in ("tp", "pp", "max_batch_size", "inference_max_seq_length", "triton_instances"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.gil_switch_interval_ms > 0:
        parser.error("--gil-switch-interval-ms must be more than 0")
    if args.frontend_processes < 0:
        parser.error("--frontend-processes must be 0 (one per 4 CPU cores) or more")
    for name in ("port", "triton_port"):
        if not 0 <= getattr(args, name) <= 65535:
            parser.error(f"--{name.replace('_', '-')} must be a port number (0-65535)")
    return ServerOptions(**{field: getattr(args, field) for field in ServerOptions.__dataclass_fields__})


def to_argv(options: ServerOptions) -> list[str]:
    """The command line that reproduces ``options`` (for relaunching under torchrun)."""
    return [
        "--checkpoint", str(options.checkpoint), "--tp", str(options.tp), "--pp", str(options.pp),
        "--max-batch-size", str(options.max_batch_size),
        "--inference-max-seq-length", str(options.inference_max_seq_length),
        "--host", options.host, "--port", str(options.port), "--triton-port", str(options.triton_port),
        "--model-name", options.model_name, "--device", options.device, "--dtype", options.dtype,
        "--attention-backend", options.attention_backend,
        "--queue-delay-us", str(options.queue_delay_us), "--triton-instances", str(options.triton_instances),
        "--gil-switch-interval-ms", str(options.gil_switch_interval_ms),
        "--request-timeout", str(options.request_timeout),
        "--frontend-processes", str(options.frontend_processes), "--cuda-graphs", options.cuda_graphs,
        *(["--log-batches"] if options.log_batches else []),
    ]


def default_frontend_processes(cpu_count: int | None) -> int:
    """One front end process per 4 CPU cores, 1 to 4: on a small machine they would take the
    cores the engine and the evaluation need; beyond 4 the engine is the limit."""
    return max(1, min(4, (cpu_count or 1) // 4))


def uses_cuda_graphs(choice: str, device_type: str, tp: int) -> bool:
    """Whether ``--cuda-graphs choice`` turns CUDA graphs on. ``auto`` leaves them off at TP > 1,
    where graphs that record NCCL collectives have not been measured yet."""
    if choice == "auto":
        return device_type == "cuda" and tp == 1
    if choice == "on" and device_type != "cuda":
        raise ValueError("--cuda-graphs on needs a CUDA device: use --cuda-graphs auto or off on the CPU")
    return choice == "on"
