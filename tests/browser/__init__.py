"""Helpers for the real-browser test (tests/test_browser.py): a headless JupyterLab server and a stand-in notebook."""
