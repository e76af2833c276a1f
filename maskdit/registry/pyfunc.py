"""The pyfunc model MLflow loads (`mlflow.pyfunc.load_model("models:/<name>@champion")`): class-conditional
sampling from a registered MaskDiT.

    predict(pd.DataFrame({"class_label": [1, 7], "seed": [0, 1]}))  # seed, cfg_scale, num_steps optional
    -> pd.DataFrame(class_label, seed, cfg_scale, num_steps, image)   # image: PNG bytes (H x W x 3)

PNG bytes keep the output a plain table that MLflow's REST serving returns as base64; decode
with `PIL.Image.open(io.BytesIO(png))`. A missing seed is the row index; missing cfg_scale /
num_steps use the registered sampler settings. The model is `MaskDiTModel`, loaded from the model's
own copy of maskdit; `mlflow models serve -m models:/<name>@champion` builds its
environment from the model's requirements (README, "Serve a model"). maskdit itself never loads a
registered model that way: `maskdit.method.modelformat` reads its files without unpickling.

How MLflow finds the class: `maskdit register` logs an instance (`python_model=MaskDiTModel()`),
which MLflow pickles by reference (cloudpickle), as the name `maskdit.registry.pyfunc.MaskDiTModel`;
the model's `MLmodel` names only MLflow's own loader (`mlflow.pyfunc.model`). Loading puts the
model's `code/` folder first on `sys.path`, so a fresh process imports that name from the model's
own copy of maskdit: a version registered by an older maskdit, which names the class where that
maskdit kept it, loads with its own code. (Versions registered while the class lived in register.py
name `maskdit.registry.register.MaskDiTModel`; register.py imports the class, so that name still
resolves in a process that imported this maskdit before loading one.)
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from maskdit.method.diffusion import SamplerConfig
from maskdit.method.modelformat import VAE_ARTIFACT

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("long", "class_label"), ColSpec("long", "seed", required=False),
                   ColSpec("double", "cfg_scale", required=False), ColSpec("long", "num_steps", required=False)]),
    outputs=Schema([ColSpec("long", "class_label"), ColSpec("long", "seed"), ColSpec("double", "cfg_scale"),
                    ColSpec("long", "num_steps"), ColSpec("binary", "image")]),
)


class MaskDiTModel(mlflow.pyfunc.PythonModel):
    """Class-conditional sampling from a registered MaskDiT (EDM Heun sampler with CFG)."""

    def load_context(self, context) -> None:
        import torch

        from maskdit.data.decode import load_decoder
        from maskdit.data.shards import Manifest
        from maskdit.method.modelformat import local_state
        from maskdit.method.weights import ema_precond

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        state = local_state(context.artifacts)  # checked: digests, config against tensors, finite
        self.precond, self.model_config = ema_precond(state, "the model's weights", self.device)
        manifest = Manifest.model_validate_json(Path(context.artifacts["manifest"]).read_text())
        if VAE_ARTIFACT in context.artifacts:  # the VAE inside the model, not the one the manifest names
            manifest = manifest.model_copy(update={"vae": context.artifacts[VAE_ARTIFACT]})
        self.decode = load_decoder(manifest, self.device)
        config = context.model_config or {}
        self.sampler = SamplerConfig(**config.get("sampler", {}))
        self.batch_size = int(config.get("batch_size", 64))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from maskdit.evaluation.sample import generate, png_bytes

        table = pd.DataFrame(model_input)
        if "class_label" not in table:
            raise ValueError(f"the input needs a class_label column; got columns {list(table.columns)}")
        n = len(table)
        labels = table["class_label"].astype("int64").tolist()
        bad = [c for c in labels if not 0 <= c < self.model_config.num_classes]
        if bad:
            raise ValueError(f"class_label {bad[0]} is outside 0..{self.model_config.num_classes - 1}")
        seeds = table["seed"].astype("int64").tolist() if "seed" in table else list(range(n))
        cfg = table["cfg_scale"].astype(float).tolist() if "cfg_scale" in table else [self.sampler.cfg_scale] * n
        steps = (table["num_steps"].astype("int64").tolist() if "num_steps" in table
                 else [self.sampler.num_steps] * n)
        images: list[bytes | None] = [None] * n
        groups: dict[tuple[float, int], list[int]] = {}
        for i in range(n):  # one sampler call per (cfg_scale, num_steps)
            groups.setdefault((cfg[i], steps[i]), []).append(i)
        for (scale, num_steps), rows in groups.items():
            sampler = self.sampler.model_copy(update={"cfg_scale": scale, "num_steps": num_steps})
            batch = generate(self.precond, self.decode, [labels[i] for i in rows], [seeds[i] for i in rows],
                             sampler, self.batch_size)  # (B, H, W, 3) uint8
            for i, image in zip(rows, batch.numpy()):
                images[i] = png_bytes(image)
        return pd.DataFrame({"class_label": labels, "seed": seeds, "cfg_scale": cfg, "num_steps": steps,
                             "image": images})
