"""Recurrent ops, one folder each: naive.py (fp32 reference), prefill.py (chunked), decode.py (Triton)."""
