"""Tools that run many pipelines as DVC experiments: the corruption sweep and the Table 1 reproduction.

Not DVC stages themselves: they queue experiments of the pipeline in dvc.yaml and compare them in MLflow.
"""
