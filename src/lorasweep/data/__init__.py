"""From the configured input to tokenized splits: reading and splitting tables, the label map, the
row -> text serializer, and the prepared-data cache."""
