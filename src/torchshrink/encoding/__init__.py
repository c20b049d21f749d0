"""Deep-Compression storage: k-means weight sharing, Huffman coding and the packed ``.tshrink`` file."""
