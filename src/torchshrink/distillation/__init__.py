"""Knowledge distillation: composable losses, ensembles of teachers, the ``distill`` and ``ensemble`` stages."""
