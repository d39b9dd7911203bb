"""``python -m limoe key=value ...``: ``limoe-train`` run as a module, for a checkout put on
``PYTHONPATH`` without console scripts (the GPU check's DDP run); Lightning starts the other
processes with the same module and arguments."""

from limoe.cli import train

if __name__ == "__main__":
    train()
