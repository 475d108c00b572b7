"""One module per screen: hardware, data (model & data), train, adapters, chat."""
