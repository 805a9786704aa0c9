"""`alignkit sample-serve`: alignkit's own sampler in a process of its own (`generation.sampler_server`)."""

from __future__ import annotations

from alignkit.commands.common import add_server_args, prepare_server


def register(sub) -> None:
    p = sub.add_parser(
        "sample-serve",
        help="start alignkit's sampler as a server training processes sample from and send weights to "
        "(generation.sampler_server; CPUs, online.async)",
    )
    add_server_args(p, port=8100)
    p.add_argument("--threads", type=int, default=1, help="CPU threads the sampler uses (default 1)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts sampled at once")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, or auto")
    p.set_defaults(fn=run)


def run(args) -> int:
    from alignkit.generation.sampler_server import serve
    from alignkit.models import resolve_model_path

    token_file, sync = prepare_server(args)
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
