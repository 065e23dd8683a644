"""FedBERT split learning (a contender of PFTT): the split model, the client side, the server loop."""
