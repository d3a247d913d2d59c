"""wattledger.probes"""
