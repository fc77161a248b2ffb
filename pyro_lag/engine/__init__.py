"""AggressiveSVI and its parts: the inner-loop rule, the MI stop rule, clipping, the guide/model split."""
