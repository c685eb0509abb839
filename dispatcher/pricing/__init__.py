"""Pricing: phone numbers and their countries, SMS segments, templates, and what a send costs."""
