"""Every host effect vmemdev makes, behind one interface (``interface.Host``).

``system.SystemHost`` is the real one and this folder is the only place that
imports the cffi shim (``native``); ``fake.FakeHost`` is for unit tests.
"""
