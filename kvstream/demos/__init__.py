"""Demos: the main job (`kvstream demo`) and the multi-turn chat demo."""
