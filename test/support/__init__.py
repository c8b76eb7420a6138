"""Helpers shared by the test folders, imported as `support` (pytest.ini: `pythonpath = test`).

camera_stream.py and collect.py also run as their own processes (by path): the tests start them.
"""
