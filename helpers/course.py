"""Facts about the course itself, set in one place: where the repository lives (Colab clones it from here)."""

REPO_URL = "https://github.com/dpo-course/neuralhermes-dpo-course"
REPO_DIRNAME = "neuralhermes-dpo-course"
NOTEBOOK_COLAB_URL = "https://colab.research.google.com/github/dpo-course/neuralhermes-dpo-course/blob/main/notebooks/{name}"
