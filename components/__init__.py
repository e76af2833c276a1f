"""Kubeflow Pipelines components: one per pipeline step, each a thin call into a `maskdit` command.

The components run in the project's image (docker/Dockerfile), which holds this package, so a
component's body only imports `components.steps` and forwards its inputs; see components/steps.py
for what each step does and components/launcher.py for the PyTorchJob launcher.
"""

IMAGE = "ghcr.io/maskdit/maskdit:0.1.0"  # docker/Dockerfile; recompile with --image for your registry
