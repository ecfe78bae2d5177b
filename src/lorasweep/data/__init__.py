"""From the configured input to tokenized splits: reading and splitting tables, the label map, the
row -> text serializer, the prepared-data cache, and the length-sorted, token-cut batches that
inference passes over tokenized rows use."""
