"""wattledger.exporters"""
