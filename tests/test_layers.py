"""Block numbering of parameter names."""



from lora_ft.modeling.layers import layer_of


def test_layer_of():
    assert layer_of("base_model.model.model.layers.11.self_attn.q_proj.lora_A.default.weight") == 11
    assert layer_of("base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight") == 0
    assert layer_of("base_model.model.classifier.modules_to_save.default.weight") is None
