"""Stage 6, publishing: upload a verified output to the Hub, each file checked to be the one verify read."""
