"""The MLflow Model Registry: what a registered model carries, the pyfunc model, the champion gate, the
register step."""


def __getattr__(name: str):
    """Model versions registered before maskdit/registry/ was a package pickled their model class as
    `maskdit.registry.MaskDiTModel`: that name still resolves, so they load beside this maskdit too."""
    if name == "MaskDiTModel":
        from maskdit.registry.pyfunc import MaskDiTModel

        return MaskDiTModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
