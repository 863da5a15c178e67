"""One engine step on several backends behind one interface (interface.py); policy.py says which runs a step."""
