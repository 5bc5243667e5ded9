//! CreateCollection, GetCollection, ListCollections, DropCollection.
use super::status::Refusal;
use super::validate::{VectorsOnly, validate_name, validate_prompts, validate_vectors_only};
use super::{MinerService, convert};
use crate::proto as pb;

impl MinerService {
    pub(super) async fn create_collection(&self, req: pb::CreateCollectionRequest) -> Result<pb::CollectionInfo, Refusal> {
        validate_name("name", &req.name)?;
        let metric = convert::metric(req.metric)?;
        let quantization = convert::quantization(req.quantization)?;
        let created = match validate_vectors_only(&req)? {
            Some(VectorsOnly { dims, encoder_name }) => self.engine.create_vectors_only(&req.name, metric, quantization, dims, &encoder_name).await?,
            None => {
                let prompts = validate_prompts(&req, self.cfg.limits.max_text_chars)?;
                self.engine.create(&req.name, metric, quantization, prompts).await?
            }
        };
        Ok(convert::collection_info(created))
    }

    pub(super) async fn get_collection(&self, req: pb::GetCollectionRequest) -> Result<pb::CollectionInfo, Refusal> {
        validate_name("name", &req.name)?;
        let coll = self.engine.get(&req.name)?;
        Ok(convert::collection_info(self.engine.summary(&coll)))
    }

    pub(super) async fn list_collections(&self) -> Result<pb::ListCollectionsResponse, Refusal> {
        Ok(pb::ListCollectionsResponse { collections: self.engine.list().into_iter().map(convert::collection_info).collect() })
    }

    pub(super) async fn drop_collection(&self, req: pb::DropCollectionRequest) -> Result<pb::DropCollectionResponse, Refusal> {
        validate_name("name", &req.name)?;
        let dropped = self.engine.drop_collection(&req.name).await?;
        Ok(pb::DropCollectionResponse { dropped })
    }
}
