"""The baselines RFC is compared with, each on the caching protocol of rfc.cache only."""
