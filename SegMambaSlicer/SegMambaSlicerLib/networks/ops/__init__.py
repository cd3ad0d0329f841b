"""networks.ops"""
