"""Facts about the course itself, set in one place: where the repository lives (Colab clones it from here), and the
install cell every notebook starts with (``scripts/nbtools.py stamp`` writes it; tests/test_colab_ready.py runs it)."""

REPO_URL = "https://github.com/dpo-course/neuralhermes-dpo-course"
REPO_DIRNAME = "neuralhermes-dpo-course"
NOTEBOOK_COLAB_URL = "https://colab.research.google.com/github/dpo-course/neuralhermes-dpo-course/blob/main/notebooks/{name}"
COLAB_COURSE_DIR = f"/content/{REPO_DIRNAME}"

# The second cell of every notebook. On Colab only: clone the course unless this runtime already has it, then
# scripts/setup_env.sh installs requirements-colab.txt into Colab's Python and keeps Colab's torch; it skips pip when
# nothing changed since its last install in this runtime. Run it twice: the second time does nothing.
INSTALL_CELL = f"""# Colab only: fetch the course, install its pinned libraries (Colab's torch is kept).
# Safe to run again: what this runtime already has is skipped.
import sys

if "google.colab" in sys.modules:
    COURSE_URL = "{REPO_URL}"
    COURSE_DIR = "{COLAB_COURSE_DIR}"
    ![ -d {{COURSE_DIR}}/.git ] || git clone -q --depth 1 {{COURSE_URL}} {{COURSE_DIR}}
    !bash {{COURSE_DIR}}/scripts/setup_env.sh
    sys.path.insert(0, COURSE_DIR)"""

# Notebook metadata that opens the notebook on a GPU runtime (a T4 on Colab's free tier).
COLAB_METADATA = {"colab": {"provenance": [], "gpuType": "T4"}, "accelerator": "GPU"}

# The parameters line every notebook's parameters cell carries (after PROFILE): runs on Google Drive on Colab.
USE_DRIVE_LINE = "USE_DRIVE = True  # on Colab: keep run folders on Google Drive, so a later runtime finds them"
