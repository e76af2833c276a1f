# The MLflow tracking server of k8s/base/mlflow.yaml. The upstream image has MLflow but not
# boto3, which the server needs to proxy artifacts to s3:// (--artifacts-destination), nor
# Flask-WTF, which its basic-auth app (--app-name basic-auth, MLflow's `auth` extra) needs, nor
# psycopg, SQLAlchemy 2.1's driver for the postgresql:// stores of k8s/components/mlflow-postgres.
# Same MLflow and boto3 versions as the project's clients (pyproject.toml,
# docker/constraints.txt). Build from the repository root:  make image
ARG MLFLOW_IMAGE=ghcr.io/mlflow/mlflow:v3.17.2
FROM ${MLFLOW_IMAGE}
ARG BOTO3_VERSION=1.44.8
ARG FLASK_WTF_VERSION=1.3.0
ARG PSYCOPG_VERSION=3.3.9
RUN pip install --no-cache-dir --disable-pip-version-check "boto3==${BOTO3_VERSION}" "Flask-WTF==${FLASK_WTF_VERSION}" \
        "psycopg[binary]==${PSYCOPG_VERSION}"
ENV HOME=/tmp
USER 10001:10001
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--host=0.0.0.0", "--port=5000"]
