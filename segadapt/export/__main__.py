"""``python -m segadapt.export RUN_DIR ...``: :func:`segadapt.export.cli.main`."""

from segadapt.export.cli import main

if __name__ == "__main__":
    main()
