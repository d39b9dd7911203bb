"""``python -m limoe.bench.train_ddp key=value ...``: ``limoe-train`` run as a module, for the
GPU check's DDP run on a checkout put on ``PYTHONPATH`` (no console scripts installed);
Lightning starts the other processes with the same module and arguments."""

from limoe.cli import train

if __name__ == "__main__":
    train()
