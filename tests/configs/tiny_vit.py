"""A 2-block ViT on 16 px synthetic shapes: the trainer tests' config (seconds per run on 2 cores)."""

from tests.helpers import tiny_supervised_config


def get_config(arg=None):
    del arg
    return tiny_supervised_config()
