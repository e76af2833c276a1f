# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first
# (the project editable, with the demo and dev extras); `make test` also builds .venv-image, the
# image's environment (docker/install.sh, runtime only), once, for tests/test_image_venv.py.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup postgres test test-fast demo bench clean image k8s-image
IMAGE_REPO ?= maskdit
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
MLFLOW_VERSION := 3.17.2

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel first, so that nothing below pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,demo]"
	# pytorch-fid only serves as the reference in one test; its torchvision pin is not wanted here.
	$(PY) -m pip install --quiet --no-deps pytorch-fid==0.3.0
	touch $(STAMP)

setup: $(STAMP) postgres

# PostgreSQL's server, for tests/test_mlflow_postgres.py and benchmarks/mlflow_load.py (MLflow on
# the store of k8s/components/mlflow-postgres): Debian's package, installed once as root (CI runs
# as root), without the cluster Debian would otherwise create and start on port 5432. The tests
# start their own server (tests/fixtures/postgres.py; as `nobody` when run as root). Elsewhere:
# install it yourself, or point MASKDIT_PG_BIN at a folder with initdb and postgres.
postgres:
	@if ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || [ -n "$$MASKDIT_PG_BIN" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  mkdir -p /etc/postgresql-common; \
	  [ -e /etc/postgresql-common/createcluster.conf ] || echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold postgresql >/dev/null; \
	else echo "make: PostgreSQL's server is not installed (needed by tests/test_mlflow_postgres.py):"; \
	  echo "  as root: apt-get install postgresql, or set MASKDIT_PG_BIN to a folder holding initdb and postgres"; fi

# The tests in TEST_WORKERS processes, a test file each at a time (pytest-xdist, --dist loadfile: a
# module's fixtures are built once). Two fit 2 cores: one process keeps about one core busy (servers,
# torchrun and KFP's subprocesses wait on each other); measured 1.44x faster on five files (docs/benchmarks.md).
TEST_WORKERS ?= 2
test: $(STAMP) postgres
	$(PY) tests/fixtures/image_venv.py
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP) postgres
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/maskdit-pipeline demo

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) .venv-image .venv-image.lock .mlflow-envs .pytest_cache build *.egg-info

# Both images, from the repository root (docker/README.md); needs a Docker engine.
image:
	@docker info >/dev/null 2>&1 || { echo "make image: no Docker engine answers here (docker info failed); build where one runs:"; \
	  echo "  docker build -f docker/Dockerfile -t $(IMAGE_REPO):$(IMAGE_TAG) ."; \
	  echo "  docker build -f docker/mlflow.Dockerfile -t $(IMAGE_REPO)-mlflow:$(MLFLOW_VERSION) ."; exit 1; }
	docker build -f docker/Dockerfile -t $(IMAGE_REPO):$(IMAGE_TAG) .
	docker build -f docker/mlflow.Dockerfile -t $(IMAGE_REPO)-mlflow:$(MLFLOW_VERSION) .

# Point k8s/ at the images you pushed (the registry that `make image IMAGE_REPO=...` tagged):
#   make k8s-image IMAGE_REPO=registry.example.com/ml/maskdit
# rewrites the two `images:` entries of k8s/components/images, which every overlay uses.
K8S_SETTINGS ?= k8s/components/images/kustomization.yaml
k8s-image:
	@case "$(IMAGE_REPO)" in */*) ;; *) echo "make k8s-image: IMAGE_REPO=$(IMAGE_REPO) names no registry the nodes can pull from;"; \
	  echo "  e.g. make k8s-image IMAGE_REPO=registry.example.com/ml/maskdit"; exit 2;; esac
	sed -i.bak -e '/- name: maskdit$$/,/newTag:/s|newName: .*|newName: $(IMAGE_REPO)|' \
	  -e '/- name: maskdit$$/,/newTag:/s|newTag: .*|newTag: "$(IMAGE_TAG)"|' \
	  -e '/- name: maskdit-mlflow$$/,/newTag:/s|newName: .*|newName: $(IMAGE_REPO)-mlflow|' \
	  -e '/- name: maskdit-mlflow$$/,/newTag:/s|newTag: .*|newTag: "$(MLFLOW_VERSION)"|' $(K8S_SETTINGS)
	rm -f $(K8S_SETTINGS).bak
	@grep -A2 -E -- '- name: maskdit(-mlflow)?$$' $(K8S_SETTINGS)
