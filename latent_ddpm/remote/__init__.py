"""What an uploaded repo holds besides the saved pipeline: remote code (`code.py`) and the model card (`card.py`)."""
