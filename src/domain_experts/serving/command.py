"""`domain-experts serve`, and `serve`, the function behind it.

Nothing heavy is imported until the command runs (torch and transformers load with the model), so `--help` answers at
once.
"""

import argparse
import os
import socket
import textwrap

API_KEY_ENVIRONMENT_VARIABLE = "DOMAIN_EXPERTS_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_host(host: str, api_key: str | None) -> None:
    """Refuse to serve beyond this machine without an API key."""
    if api_key is None and host not in LOOPBACK_HOSTS:
        raise ValueError(
            f"Serving on {host} without an API key would let anyone who reaches this machine use the model: set an "
            f"API key (`api_key`; on the command line --api-key or the {API_KEY_ENVIRONMENT_VARIABLE} environment "
            "variable), or serve on 127.0.0.1."
        )
    if api_key is not None and not api_key.strip():
        raise ValueError("The API key is empty: give a non-empty key, or none to serve on 127.0.0.1 only.")


def check_port(host: str, port: int) -> None:
    """Refuse a port out of range, an address that is not this machine's, or a port another server holds, before the
    model loads (minutes, for a large one) rather than after."""
    if not 0 <= port <= 65535:
        raise ValueError(f"The port must be in 0-65535 (--port), got {port}.")
    # The socket uvicorn binds: IPv6 for an address with a colon, else IPv4, reusing a port that is closing.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise OSError(f"Cannot listen on {host}:{port} ({error.strerror}): give an address of this machine "
                          "(`host`, --host) and a port no other server holds (`port`, --port).") from None


def serve(
    model,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 16,
    batch_wait: float = 0.005,
    log_level: str = "info",
) -> None:
    """Serve a loaded `DomainExpertsForCausalLM` over HTTP (OpenAI-compatible) until interrupted.

    Args:
        host: the address to listen on; anything but a loopback address needs `api_key`.
        api_key: when set, clients must send `Authorization: Bearer <api_key>`.
        max_batch_size, batch_wait: how the engine batches concurrent requests (see `create_app`).
        log_level: uvicorn's log level.
    """
    check_host(host, api_key)
    check_port(host, port)
    from transformers.utils import logging

    logger = logging.get_logger(__name__)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as error:
        message = f"Serving needs FastAPI and uvicorn: pip install 'domain_experts[serve]' ({error})."
        raise ImportError(message) from error
    app = create_app(model, api_key=api_key, max_batch_size=max_batch_size, batch_wait=batch_wait)
    routes = ", ".join(app.state.model_io.route_names)
    logger.warning(f"Serving routes {routes} on http://{host}:{port}/v1 (batches of up to {max_batch_size}).")
    if api_key is None:
        logger.warning(f"No API key set: serving on {host} only, to clients on this machine. To serve other hosts, "
                       f"set an API key (--api-key or {API_KEY_ENVIRONMENT_VARIABLE}) and --host.")
    uvicorn.run(app, host=host, port=port, log_level=log_level)


def run_serve(args: argparse.Namespace) -> None:
    """Load the model (and packs) named by `args`, then serve it."""
    from transformers.utils import logging

    from ..files import check_location
    from ..modeling_domain_experts import DomainExpertsForCausalLM
    from ..packs import parse_pack_spec

    logger = logging.get_logger(__name__)

    api_key = args.api_key or os.environ.get(API_KEY_ENVIRONMENT_VARIABLE) or None
    # Everything that can refuse the start is checked before the model loads.
    check_location(args.model)
    check_host(args.host, api_key)
    check_port(args.host, args.port)
    if args.max_batch_size < 1 or args.batch_wait_ms < 0:
        raise ValueError(f"--max-batch-size must be at least 1 and --batch-wait-ms at least 0, got "
                         f"{args.max_batch_size} and {args.batch_wait_ms}.")
    hub_kwargs = {key: value for key, value in (("revision", args.revision), ("token", args.token)) if value}
    model = DomainExpertsForCausalLM.from_pretrained(args.model, **hub_kwargs)
    for spec in args.domain_pack or []:
        name = model.load_domain(**{**parse_pack_spec(spec), **({"token": args.token} if args.token else {})})
        logger.warning(f"Loaded domain pack {spec} as {name!r}.")
    if args.device:
        model.to(args.device)
    serve(model, host=args.host, port=args.port, api_key=api_key, max_batch_size=args.max_batch_size,
          batch_wait=args.batch_wait_ms / 1000, log_level=args.log_level)


def add_serve_command(commands: argparse._SubParsersAction) -> None:
    """Add `serve` to the `domain-experts` subcommands."""
    description = textwrap.fill(
        "Serve a composed model: POST /v1/completions and /v1/chat/completions (OpenAI), POST /generate (TGI), GET "
        "/v1/models. A request's \"model\" is a domain name, `base` (the bare backbone) or `auto` (the learned gate "
        "decides); concurrent requests of any routes run as one mixed batch.", width=100)
    parser = commands.add_parser(
        "serve", help="serve a composed model over an OpenAI-compatible HTTP API, one route per domain",
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"""\
examples:
  domain-experts serve runs/recipes/model
  domain-experts serve carol/composed --revision 0f3c2a1 --domain-pack law=bob/legal@v1 --port 8080
  {API_KEY_ENVIRONMENT_VARIABLE}=... domain-experts serve carol/composed --revision 0f3c2a1 --host 0.0.0.0
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{{"model": "recipes", "prompt": "Title: Pancakes", "max_tokens": 40}}'
""")
    parser.add_argument("model", help="a saved DomainExperts model: a folder or a Hub repo id")
    parser.add_argument("--revision", help="with a Hub repo id: the branch, tag or commit to serve (pin one)")
    parser.add_argument("--token", help="a Hugging Face token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--domain-pack", action="append", metavar="PACK",
                        help="[NAME=]REPO_ID_OR_FOLDER[@REVISION]: a domain pack to add at start (repeatable)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (default: 127.0.0.1; any other needs an API key)")
    parser.add_argument("--port", type=int, default=8000, help="the port to listen on (default: 8000)")
    parser.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: "
                                          f"${API_KEY_ENVIRONMENT_VARIABLE}; prefer the variable: arguments show in "
                                          "the process list)")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="the most requests generated together in one batch (default: 16; 1: one at a time)")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="how long to wait for more requests once one arrives, in milliseconds (default: 5)")
    parser.add_argument("--device", help="where the model runs, e.g. cuda (default: where it loads, the CPU)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level (default: info)")
    parser.set_defaults(run=run_serve)
