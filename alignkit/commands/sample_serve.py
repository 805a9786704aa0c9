"""`alignkit sample-serve`: alignkit's own sampler in a process of its own (`generation.sampler_server`)."""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser(
        "sample-serve",
        help="start alignkit's sampler as a server training processes sample from and send weights to "
        "(generation.sampler_server; CPUs, online.async)",
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="the policy's starting model (directory or hub id)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (0.0.0.0: every one; every request still needs the server's secret)",
    )
    p.add_argument("--port", type=int, default=8100)
    p.add_argument(
        "--sync-dir",
        help="the directory weight updates come from: the trainers' generation.vllm_sync_dir "
        "(on a filesystem both machines see when they differ); default: the temporary directory",
    )
    p.add_argument(
        "--token-file",
        help="where to write the secret clients must send (default: "
        "<sync dir>/alignkit-vllm-server-<port>.token); ALIGNKIT_VLLM_TOKEN gives the secret itself",
    )
    p.add_argument("--threads", type=int, default=1, help="CPU threads the sampler uses (default 1)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts sampled at once")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, or auto")
    p.set_defaults(fn=run)


def run(args) -> int:
    from pathlib import Path

    from alignkit.generation.sampler_server import serve
    from alignkit.generation.vllm_engine import default_token_file, updates_dir, write_token
    from alignkit.models import resolve_model_path

    token_file = Path(args.token_file) if args.token_file else default_token_file(args.sync_dir, args.port)
    given = os.environ.get("ALIGNKIT_VLLM_TOKEN")
    write_token(token_file, given.strip() if given else None)
    sync = updates_dir(args.sync_dir)
    sync.mkdir(mode=0o700, parents=True, exist_ok=True)
    print(
        f"alignkit: serving {args.model} (alignkit's sampler, {args.threads} thread(s)) at "
        f"http://{args.host}:{args.port}\n"
        f"  every request needs the secret in {token_file} (readable by you only)\n"
        f"  weight updates are read only from {sync} (generation.vllm_sync_dir={args.sync_dir or '<unset>'})\n"
        f"  set generation.sampler_server=http://<this host>:{args.port}",
        flush=True,
    )
    serve(
        resolve_model_path(args.model),
        args.host,
        args.port,
        token_file,
        sync,
        threads=args.threads,
        batch_size=args.batch_size,
        device=args.device,
    )
    return 0
