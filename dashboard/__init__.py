"""The Streamlit dashboard. It reads the metrics store and nothing else."""
