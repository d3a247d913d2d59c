"""wattledger.agent"""
