"""`alignkit vllm-serve`: vLLM's server behind alignkit's gate, for training processes."""

from __future__ import annotations

import os

from alignkit.commands.common import add_server_args, prepare_server
from alignkit.errors import AlignkitError


def register(sub) -> None:
    p = sub.add_parser(
        "vllm-serve",
        help="start a vLLM server that training processes sample from and send weights to (generation.vllm_server)",
    )
    add_server_args(p, port=8000)
    p.add_argument("--kv-cache-gib", type=float, help="KV cache size in GiB (default on CPU: 1)")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="share of GPU memory instead of --kv-cache-gib (default on GPUs: 0.9)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (float32 on CPUs, as the trainer there; vLLM's choice on GPUs), float32, bfloat16",
    )
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument(
        "--logprobs",
        choices=["processed", "raw"],
        default="processed",
        help="the log-probs of sampled tokens the server returns: processed (the distribution each token was "
        "drawn from, after temperature, top-k and top-p: what online training needs) or raw (the model's own, "
        "temperature 1); greedy requests and prompt log-probs (a judge's) are the same in both",
    )
    p.add_argument(
        "--weight-transport",
        choices=["directory", "nccl"],
        default="directory",
        help="how trainers send weights: directory (safetensors in --sync-dir; CPU and GPU) or nccl (a broadcast "
        "from the trainer's GPU through vLLM's weight-transfer API; CUDA only; trainers set "
        "generation.weight_transport=nccl)",
    )
    p.add_argument(
        "--max-lora-rank",
        type=int,
        help="serve LoRA runs: trainers with lora.r up to this send their adapters (loaded in place, "
        "applied to --model) instead of merged weights",
    )
    p.set_defaults(fn=run)


def run(args) -> int:
    from alignkit import scratch
    from alignkit.generation.vllm_engine import SOCKETS, import_vllm, serve_command, temp_files_in
    from alignkit.models import resolve_model_path

    import_vllm()
    if args.kv_cache_gib is not None and args.gpu_memory_utilization is not None:
        raise AlignkitError("vllm-serve: give --kv-cache-gib or --gpu-memory-utilization, not both.")
    if args.weight_transport == "nccl":
        import torch

        if not torch.cuda.is_available():
            raise AlignkitError(
                "vllm-serve: --weight-transport nccl needs CUDA GPUs; use --weight-transport directory."
            )
    token_file, updates = prepare_server(args)
    cmd, env = serve_command(
        resolve_model_path(args.model),
        args.host,
        args.port,
        args.dtype,
        args.max_model_len,
        token_file=token_file,
        sync_dir=args.sync_dir,
        kv_cache_gib=args.kv_cache_gib,
        gpu_memory_utilization=args.gpu_memory_utilization,
        logprobs=args.logprobs,
        transport=args.weight_transport,
        lora_rank=args.max_lora_rank,
    )
    print(
        f"alignkit: serving {args.model} for training processes at http://{args.host}:{args.port}\n"
        f"  every request needs the secret in {token_file} (readable by you only); clients on this machine find it "
        "there; elsewhere copy it and set generation.vllm_token_file (or ALIGNKIT_VLLM_TOKEN)\n"
        f"  weight updates are read only from {updates} (generation.vllm_sync_dir="
        f"{args.sync_dir or '<unset>'})\n"
        f"  set generation.backend=vllm generation.vllm_server=http://<this host>:{args.port}",
        flush=True,
    )
    # the server's temporary files (vLLM's sockets, 7 an engine, and its processes' rendezvous file,
    # which it never removes) in a directory of this process's, which the server is: the next engine
    # or server on the machine sweeps it once the server has ended
    temp_files_in(env, scratch.scratch_dir(SOCKETS))
    # exec, not a child: the server is this process, so a signal to it (Ctrl-C, a job scheduler's
    # SIGTERM) stops the server instead of leaving it running without its parent
    os.execve(cmd[0], cmd, env)
