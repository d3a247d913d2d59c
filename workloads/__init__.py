"""wattledger.workloads"""
