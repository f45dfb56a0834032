"""``python -m balsam.server [--host H] [--port P] [--workers N]``: run the service with uvicorn."""

from __future__ import annotations

import argparse
import os


def main(argv: "list[str] | None" = None) -> None:
    import uvicorn

    from .settings import uvicorn_proxy_options

    parser = argparse.ArgumentParser(prog="python -m balsam.server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--database-url", default=None, help="default: $BALSAM_DATABASE_URL or the embedded SQLite")
    parser.add_argument("--log-level", default=os.environ.get("BALSAM_LOG_LEVEL", "info").lower())
    args = parser.parse_args(argv)
    if args.database_url:
        os.environ["BALSAM_DATABASE_URL"] = args.database_url
    uvicorn.run(
        "balsam.server.app:create_app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        timeout_keep_alive=30,
        **uvicorn_proxy_options(),  # type: ignore[arg-type]
    )


if __name__ == "__main__":
    main()
