# LMDeploy's quick start with TurbomindEngineConfig (every 0.3 argument spelled out, as scripts copy
# them), unchanged but for the import line and the model path.
from tidemind import pipeline, TurbomindEngineConfig  # was: from lmdeploy import pipeline, TurbomindEngineConfig

backend_config = TurbomindEngineConfig(model_name=None,
                                       model_format='hf',
                                       tp=1,
                                       session_len=2048,
                                       max_batch_size=128,
                                       cache_max_entry_count=0.2,
                                       cache_block_seq_len=64,
                                       quant_policy=0,
                                       rope_scaling_factor=0.0,
                                       use_logn_attn=False,
                                       download_dir=None,
                                       revision=None,
                                       max_prefill_token_num=8192)
pipe = pipeline('smollm2-135m',  # was: 'internlm/internlm2-chat-7b'
                backend_config=backend_config)
response = pipe(['Hi, pls intro yourself', 'Shanghai is'])
print(response)
