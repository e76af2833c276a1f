"""Kubeflow Pipelines components: one per pipeline step, each a thin call into a `maskdit` command.

The components run in the project's image (docker/Dockerfile), which holds this package, so a
component's body only imports `components.steps` and forwards its inputs; see components/steps.py
for what each step does and components/launcher.py (with components/pytorchjob.py) for the PyTorchJob launcher.
"""

from maskdit import __version__

IMAGE = f"ghcr.io/maskdit/maskdit:{__version__}"  # docker/Dockerfile; recompile with --image for your registry
