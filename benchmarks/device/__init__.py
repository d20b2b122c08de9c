"""Running the GPU checks on a lent machine that reaches no package index: what is carried there
(`pack.sh`, `strip_fatbin.py`, `slim.py`) and the one script that runs there (`run.sh`)."""
