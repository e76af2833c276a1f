"""Which Kubeflow Pipelines backends the compiled pipeline suits, and compiling for an older one.

KFP's API server parses an uploaded PipelineSpec strictly (`protojson.Unmarshal` in
backend/src/apiserver/template/v2_template.go), and its Argo compiler each executor's
Kubernetes config strictly too (`protojson.Unmarshal` into KubernetesExecutorConfig in
backend/src/v2/compiler/argocompiler/container.go): a field that the backend's protos do not
know fails the run with "unknown field". The deployment spec (the executors' containers) is
read with DiscardUnknown, so it is not checked here.

The SDK (kfp / kfp-kubernetes 2.17) writes `optional` on every secret and ConfigMap env
(`use_secret_as_env(..., optional=...)`), which backends before 2.15 reject.
`--kfp-backend 2.14` leaves that field out; each such Secret and ConfigMap is then required,
with every key the pipeline reads (the overlays in k8s/ create them all, the optional ones empty).
The step pods' `securityContext` (runAsNonRoot as the image's user) needs a 2.16 backend: for an
older one it is left out, and the pods run as the image's USER without the API server knowing it
(a namespace that enforces runAsNonRoot then rejects them: docs/operating.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import yaml

from maskdit.core.errors import UserError

SUPPORTED_BACKENDS = ("2.14", "2.15", "2.16", "2.17")
MINIMUM_BACKEND, NEWEST_BACKEND = SUPPORTED_BACKENDS[0], SUPPORTED_BACKENDS[-1]
OPTIONAL_ENV_SINCE = "2.15"  # kubeflow/pipelines#12216 (commit 55ec846): `optional` on SecretAsEnv/ConfigMapAsEnv
SECURITY_CONTEXT_SINCE = "2.16"  # KubernetesExecutorConfig.securityContext (kfp-kubernetes set_security_context)

# ------------------------------------------------------------------------------------------
# The fields each backend knows, as JSON names: "field", "field:Message" where the value is a
# message (or a list of them), "field:{Message}" for a map of them; google.protobuf.Struct and
# Value fields take any JSON.
# Transcribed from kubeflow/pipelines at tag 2.14.4: api/v2alpha1/pipeline_spec.proto (the
# messages PipelineSpec reaches, without deploymentSpec) and
# kubernetes_platform/proto/kubernetes_executor_config.proto (those KubernetesExecutorConfig
# reaches); then what changed at tags 2.15.0, 2.16.0 and 2.17.0 ("+field" new, "-field" gone).
# ------------------------------------------------------------------------------------------

_FIELDS_2_14: dict[str, str] = {
    "PipelineSpec": (
        "pipelineInfo:PipelineInfo deploymentSpec sdkVersion schemaVersion "
        "components:{ComponentSpec} root:ComponentSpec defaultPipelineRoot"
    ),
    "ComponentSpec": (
        "inputDefinitions:ComponentInputsSpec outputDefinitions:ComponentOutputsSpec "
        "dag:DagSpec executorLabel singlePlatformSpecs:SinglePlatformSpec"
    ),
    "SinglePlatformSpec": (
        "deploymentSpec:PlatformDeploymentConfig platform config "
        "pipelineConfig:PipelineConfig"
    ),
    "PipelineConfig": "semaphoreKey mutexName resourceTtl workspace:WorkspaceConfig",
    "WorkspaceConfig": "size kubernetes:KubernetesWorkspaceConfig",
    "KubernetesWorkspaceConfig": "pvcSpecPatch",
    "PlatformDeploymentConfig": "executors",
    "DagSpec": "tasks:{PipelineTaskSpec} outputs:DagOutputsSpec",
    "DagOutputsSpec": (
        "artifacts:{DagOutputsSpec.DagOutputArtifactSpec} "
        "parameters:{DagOutputsSpec.DagOutputParameterSpec}"
    ),
    "DagOutputsSpec.DagOutputParameterSpec": (
        "valueFromParameter:DagOutputsSpec.ParameterSelectorSpec "
        "valueFromOneof:DagOutputsSpec.ParameterSelectorsSpec"
    ),
    "DagOutputsSpec.ParameterSelectorsSpec": "parameterSelectors:DagOutputsSpec.ParameterSelectorSpec",
    "DagOutputsSpec.ParameterSelectorSpec": "producerSubtask outputParameterKey",
    "DagOutputsSpec.DagOutputArtifactSpec": "artifactSelectors:DagOutputsSpec.ArtifactSelectorSpec",
    "DagOutputsSpec.ArtifactSelectorSpec": "producerSubtask outputArtifactKey",
    "PipelineTaskSpec": (
        "taskInfo:PipelineTaskInfo inputs:TaskInputsSpec dependentTasks "
        "cachingOptions:PipelineTaskSpec.CachingOptions componentRef:ComponentRef "
        "triggerPolicy:PipelineTaskSpec.TriggerPolicy "
        "artifactIterator:ArtifactIteratorSpec parameterIterator:ParameterIteratorSpec "
        "retryPolicy:PipelineTaskSpec.RetryPolicy "
        "iteratorPolicy:PipelineTaskSpec.IteratorPolicy"
    ),
    "PipelineTaskSpec.IteratorPolicy": "parallelismLimit",
    "PipelineTaskSpec.RetryPolicy": "maxRetryCount backoffDuration backoffFactor backoffMaxDuration",
    "ParameterIteratorSpec": "items:ParameterIteratorSpec.ItemsSpec itemInput",
    "ParameterIteratorSpec.ItemsSpec": "raw inputParameter",
    "ArtifactIteratorSpec": "items:ArtifactIteratorSpec.ItemsSpec itemInput",
    "ArtifactIteratorSpec.ItemsSpec": "inputArtifact",
    "PipelineTaskSpec.TriggerPolicy": "condition strategy",
    "ComponentRef": "name",
    "PipelineTaskSpec.CachingOptions": "enableCache cacheKey",
    "TaskInputsSpec": (
        "parameters:{TaskInputsSpec.InputParameterSpec} "
        "artifacts:{TaskInputsSpec.InputArtifactSpec}"
    ),
    "TaskInputsSpec.InputArtifactSpec": (
        "taskOutputArtifact:TaskInputsSpec.InputArtifactSpec.TaskOutputArtifactSpec "
        "componentInputArtifact"
    ),
    "TaskInputsSpec.InputArtifactSpec.TaskOutputArtifactSpec": "producerTask outputArtifactKey",
    "TaskInputsSpec.InputParameterSpec": (
        "taskOutputParameter:TaskInputsSpec.InputParameterSpec.TaskOutputParameterSpec "
        "runtimeValue:ValueOrRuntimeParameter componentInputParameter "
        "taskFinalStatus:TaskInputsSpec.InputParameterSpec.TaskFinalStatus "
        "parameterExpressionSelector"
    ),
    "TaskInputsSpec.InputParameterSpec.TaskFinalStatus": "producerTask",
    "ValueOrRuntimeParameter": "constantValue:Value runtimeParameter constant",
    "Value": "intValue doubleValue stringValue",
    "TaskInputsSpec.InputParameterSpec.TaskOutputParameterSpec": "producerTask outputParameterKey",
    "PipelineTaskInfo": "name",
    "ComponentOutputsSpec": (
        "artifacts:{ComponentOutputsSpec.ArtifactSpec} "
        "parameters:{ComponentOutputsSpec.ParameterSpec}"
    ),
    "ComponentOutputsSpec.ParameterSpec": "type parameterType description",
    "ComponentOutputsSpec.ArtifactSpec": (
        "artifactType:ArtifactTypeSchema properties:{ValueOrRuntimeParameter} "
        "customProperties:{ValueOrRuntimeParameter} metadata isArtifactList description"
    ),
    "ArtifactTypeSchema": "schemaTitle schemaUri instanceSchema schemaVersion",
    "ComponentInputsSpec": (
        "artifacts:{ComponentInputsSpec.ArtifactSpec} "
        "parameters:{ComponentInputsSpec.ParameterSpec}"
    ),
    "ComponentInputsSpec.ParameterSpec": "type parameterType defaultValue isOptional description",
    "ComponentInputsSpec.ArtifactSpec": "artifactType:ArtifactTypeSchema isArtifactList isOptional description",
    "PipelineInfo": "name displayName description",
    "KubernetesExecutorConfig": (
        "secretAsVolume:SecretAsVolume secretAsEnv:SecretAsEnv pvcMount:PvcMount "
        "nodeSelector:NodeSelector podMetadata:PodMetadata "
        "imagePullSecret:ImagePullSecret imagePullPolicy "
        "configMapAsVolume:ConfigMapAsVolume configMapAsEnv:ConfigMapAsEnv "
        "activeDeadlineSeconds fieldPathAsEnv:FieldPathAsEnv tolerations:Toleration "
        "genericEphemeralVolume:GenericEphemeralVolume nodeAffinity:NodeAffinityTerm "
        "podAffinity:PodAffinityTerm enabledSharedMemory:EnabledSharedMemory "
        "emptyDirMounts:EmptyDirMount"
    ),
    "EmptyDirMount": "volumeName mountPath medium sizeLimit",
    "EnabledSharedMemory": "volumeName size",
    "PodAffinityTerm": (
        "matchPodExpressions:SelectorRequirement matchPodLabels topologyKey namespaces "
        "matchNamespaceExpressions:SelectorRequirement matchNamespaceLabels weight anti"
    ),
    "SelectorRequirement": "key operator values",
    "NodeAffinityTerm": (
        "matchExpressions:SelectorRequirement matchFields:SelectorRequirement weight "
        "nodeAffinityJson:TaskInputsSpec.InputParameterSpec"
    ),
    "GenericEphemeralVolume": (
        "volumeName mountPath accessModes size defaultStorageClass storageClassName "
        "metadata:PodMetadata"
    ),
    "PodMetadata": "labels annotations",
    "Toleration": (
        "key operator value effect tolerationSeconds "
        "tolerationJson:TaskInputsSpec.InputParameterSpec"
    ),
    "FieldPathAsEnv": "name fieldPath",
    "ConfigMapAsEnv": (
        "configMapName keyToEnv:ConfigMapAsEnv.ConfigMapKeyToEnvMap "
        "configMapNameParameter:TaskInputsSpec.InputParameterSpec"
    ),
    "ConfigMapAsEnv.ConfigMapKeyToEnvMap": "configMapKey envVar",
    "ConfigMapAsVolume": (
        "configMapName mountPath optional "
        "configMapNameParameter:TaskInputsSpec.InputParameterSpec"
    ),
    "ImagePullSecret": "secretName secretNameParameter:TaskInputsSpec.InputParameterSpec",
    "NodeSelector": "labels nodeSelectorJson:TaskInputsSpec.InputParameterSpec",
    "PvcMount": (
        "taskOutputParameter:TaskInputsSpec.InputParameterSpec.TaskOutputParameterSpec "
        "constant componentInputParameter mountPath "
        "pvcNameParameter:TaskInputsSpec.InputParameterSpec"
    ),
    "SecretAsEnv": (
        "secretName keyToEnv:SecretAsEnv.SecretKeyToEnvMap "
        "secretNameParameter:TaskInputsSpec.InputParameterSpec"
    ),
    "SecretAsEnv.SecretKeyToEnvMap": "secretKey envVar",
    "SecretAsVolume": (
        "secretName mountPath optional "
        "secretNameParameter:TaskInputsSpec.InputParameterSpec"
    ),
}

_CHANGES: dict[str, dict[str, str]] = {
    "2.15": {
        "ComponentSpec": "+taskConfigPassthroughs:TaskConfigPassthrough",
        "TaskConfigPassthrough": "+field +applyToTask",
        "PipelineConfig": "-semaphoreKey -mutexName",
        "ConfigMapAsEnv": "+optional",
        "SecretAsEnv": "+optional",
    },
    "2.16": {
        "ComponentInputsSpec.ParameterSpec": "+literals",
        "KubernetesExecutorConfig": "+securityContext:SecurityContext",
        "SecurityContext": "+runAsUser +runAsGroup +runAsNonRoot",
        "PvcMount": "+subPath",
    },
    "2.17": {
        "PipelineConfig": "+resourceTtlOnCompletion +resourceTtlOnSuccess +resourceTtlOnFailure "
                          "+activeDeadlineSeconds -resourceTtl",
    },
}


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def check_backend(version: str) -> str:
    """`version` as major.minor when it is a supported backend, else a UserError naming the supported ones."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.\d+)?", version.strip())
    minor = f"{match.group(1)}.{match.group(2)}" if match else version
    if minor not in SUPPORTED_BACKENDS:
        raise UserError(f"KFP backend {version!r} is not supported: use one of {', '.join(SUPPORTED_BACKENDS)} "
                        f"(backends older than {MINIMUM_BACKEND} are not; see docs/operating.md)")
    return minor


def known_fields(version: str) -> dict[str, dict[str, str | None]]:
    """message -> {JSON field name: message type or None} for KFP backend `version`."""
    version = check_backend(version)
    fields = {message: dict(_parse(spec)) for message, spec in _FIELDS_2_14.items()}
    for step in SUPPORTED_BACKENDS[1:]:
        if _version_key(step) > _version_key(version):
            break
        for message, change in _CHANGES[step].items():
            current = fields.setdefault(message, {})
            for word in change.split():
                name, kind = _parse_one(word[1:])
                if word[0] == "+":
                    current[name] = kind
                else:
                    current.pop(name)
    return fields


def _parse_one(word: str) -> tuple[str, str | None]:
    name, _, kind = word.partition(":")
    return name, kind or None


def _parse(spec: str) -> Iterator[tuple[str, str | None]]:
    return (_parse_one(word) for word in spec.split())


def unknown_fields(spec: dict[str, Any], platform: dict[str, Any] | None, version: str) -> list[str]:
    """Paths of the fields in a compiled pipeline (its two YAML documents) that backend `version`
    does not know; [] when it accepts them all."""
    fields = known_fields(version)
    found: list[str] = []

    def walk(value: Any, message: str, path: str) -> None:
        known = fields.get(message)
        if known is None:
            found.append(f"{path}: message {message} is not described in pipelines/kfp_backend.py")
            return
        for name, item in value.items():
            if name not in known:
                found.append(f"{path}.{name}")
                continue
            kind = known[name]
            if kind is None:
                continue
            if kind.startswith("{"):
                for key, child in item.items():
                    walk(child, kind[1:-1], f"{path}.{name}.{key}")
                continue
            for child in item if isinstance(item, list) else [item]:
                walk(child, kind, f"{path}.{name}")

    walk({k: v for k, v in spec.items() if k != "deploymentSpec"}, "PipelineSpec", "pipelineSpec")
    executors = (((platform or {}).get("platforms") or {}).get("kubernetes") or {}).get("deploymentSpec", {})
    for name, config in (executors.get("executors") or {}).items():
        walk(config, "KubernetesExecutorConfig", f"kubernetes.executors.{name}")
    return found


# ------------------------------------------------------------------------------------------
# Compiling for a backend
# ------------------------------------------------------------------------------------------

def for_backend(platform: dict[str, Any], version: str) -> dict[str, Any]:
    """The platform document with what `version` lacks left out: before 2.15, `optional` on
    secret/ConfigMap env (the Secret or ConfigMap, and its keys, then must exist); before 2.16, the
    step pods' securityContext."""
    key = _version_key(check_backend(version))
    executors = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
    for config in executors.values():
        if key < _version_key(SECURITY_CONTEXT_SINCE):
            config.pop("securityContext", None)
        if key < _version_key(OPTIONAL_ENV_SINCE):
            for entry in config.get("secretAsEnv", []) + config.get("configMapAsEnv", []):
                entry.pop("optional", None)
    for name in [name for name, config in executors.items() if not config]:
        del executors[name]  # a step whose only setting was left out has none
    return platform


def rewrite_for_backend(path: Path, version: str) -> Path:
    """Rewrite the compiled pipeline at `path` for KFP backend `version`, and refuse (UserError)
    when it still uses a field that backend does not know."""
    text = path.read_text()
    head, sep, platform_text = text.rpartition("\n---\n")
    spec = yaml.safe_load(head if sep else text)
    platform = yaml.safe_load(platform_text) if sep else None
    if platform is not None and _version_key(check_backend(version)) < _version_key(SECURITY_CONTEXT_SINCE):
        platform = for_backend(platform, version)
        path.write_text(head + sep + yaml.safe_dump(platform, sort_keys=True))
    unknown = unknown_fields(spec, platform, version)
    if unknown:
        raise UserError(f"the compiled pipeline uses fields KFP backend {version} does not know: "
                        f"{', '.join(unknown[:10])}; compile for a newer backend (--kfp-backend) or leave the "
                        f"feature out")
    return path
