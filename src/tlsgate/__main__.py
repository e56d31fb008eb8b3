"""``python -m tlsgate``: the same command as the ``tlsgate`` script."""

from tlsgate.cli import main

if __name__ == "__main__":
    main()
