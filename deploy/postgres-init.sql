-- MLflow keeps its own schema (and its own alembic_version table): a database of its own.
CREATE DATABASE mlflow OWNER migrator;
