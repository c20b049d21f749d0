"""torchshrink's own stages; each module registers its kinds with :mod:`torchshrink.registry`."""
